"""The REST inference service: `create_app(settings)` builds the FastAPI application."""

from wsi_mil.service.app import create_app as create_app
from wsi_mil.service.settings import ServiceSettings as ServiceSettings
