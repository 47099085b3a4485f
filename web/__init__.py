"""LPMOS web package."""
