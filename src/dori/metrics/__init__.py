"""dori.metrics"""
