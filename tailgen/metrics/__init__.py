"""tailgen.metrics"""
