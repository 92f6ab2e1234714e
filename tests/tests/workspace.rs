//! Workspace-level tests, one binary: the allowed edges between crates.

mod architecture;
