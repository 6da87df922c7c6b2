//! Support for netdrop integration tests.
