"""Readers of ../shared/data (Online Retail purchases, product and style images), with labelled synthetic stand-ins."""
