"""`aesthetics serve OUTPUT`: a Ray Serve application over a scored output.

Two deployments: ``ScoringModel`` holds CLIP, the heads and the prompt sets (loaded once per replica, on a
GPU when the cluster has one) and scores uploads in batches formed by ``@serve.batch``; ``Api`` is the
FastAPI ingress that serves the page and the HTTP API, embeds text queries through the model, and reads the
output (selection, rows, images with one ranged read of their shard). See :mod:`pipeline.serve.app`.
"""
