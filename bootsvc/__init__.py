"""LPMOS bootsvc package."""
