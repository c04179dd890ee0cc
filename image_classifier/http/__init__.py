"""The boundary, the only floor that knows HTTP: middleware (request ids, caps, admission, drain),
multipart, response schemas, the error envelope, Open Inference routes, pages and access logs.

Imports `serving` and `core`; nothing imports it but `service.py`.
"""
