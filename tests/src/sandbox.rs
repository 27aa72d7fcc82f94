//! Helpers for the sandbox tests: the hostile fixtures, processes by marker.
