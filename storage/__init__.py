"""SQLModel tables, the async engine, repositories and the audit chain."""
