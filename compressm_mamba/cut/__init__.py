"""The cut pipeline: collect Gramians -> decide (HSVs, ranks) -> surgery -> recorded state sizes."""
