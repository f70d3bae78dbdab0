"""The consultation domain: pure Python, no web, media or database imports."""
