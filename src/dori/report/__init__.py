"""dori.report"""
