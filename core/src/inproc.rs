//! In-process transport (being written).
