"""The REST API under /api/v1: schemas, routes, errors and the OpenAPI document."""
