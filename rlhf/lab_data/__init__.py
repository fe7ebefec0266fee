"""The lab's own starter data (prompts and demonstrations), shipped with the package."""
