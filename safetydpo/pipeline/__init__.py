"""The whole method as one resumable, config-driven run: data -> experts -> merge -> evaluate -> report.

Nothing is imported here: plugins register into ``safetydpo.pipeline.extensions`` without loading the
stages (and with them Lightning, the builder and the evaluation suite).
"""
