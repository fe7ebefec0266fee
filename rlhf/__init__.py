"""rlhf package."""
