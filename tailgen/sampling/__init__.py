"""tailgen.sampling"""
