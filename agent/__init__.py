"""LPMOS agent package."""
