"""Alembic migrations of Yanray's schema."""
