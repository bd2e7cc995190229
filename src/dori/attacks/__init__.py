"""dori.attacks"""
