"""storage/migrations/versions"""
