//! PostgreSQL backend for `es-core`: not built yet; see the project issues.
