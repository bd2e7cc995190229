"""dori.analysis"""
