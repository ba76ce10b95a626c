"""The bundled verifiable tasks: arithmetic (the demo) and constraints (for real chat models)."""
