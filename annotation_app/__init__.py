"""annotation_app package."""
