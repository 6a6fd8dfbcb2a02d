"""tailgen.data"""
