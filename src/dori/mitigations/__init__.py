"""dori.mitigations"""
