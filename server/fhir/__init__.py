"""FHIR R4B views of the consultation record."""
