"""onetag: one script tag and one dataLayer for every e-commerce email vendor."""

__version__ = "0.1.0"
