"""runtimed"""
