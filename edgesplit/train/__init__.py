"""edgesplit.train"""
