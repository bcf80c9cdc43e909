"""lazyfs"""
