"""storage/migrations"""
