"""The inspection gateway: FastAPI in front of Triton or embedded ONNX Runtime. Never imports torch.

``slsg_gateway.app.create_app(settings)`` builds the app; ``slsg serve`` runs it with uvicorn.
"""
