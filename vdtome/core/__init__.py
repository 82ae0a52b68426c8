"""Shared ground every layer stands on: input validation, the denoisers of a pipeline, the step
context, the video array convention, model presets. Imports nothing else from vdtome."""
