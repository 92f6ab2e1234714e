//! Workspace-level tests, one binary: the allowed edges between crates, and
//! end-to-end tests that run the real `dhrtd` and `dhrt-cli` binaries.

mod architecture;
mod bench;
mod cli;
mod cluster;
mod crash;
mod dhrtd;
mod disk_full;
mod faults;
mod hostile;
mod memory;
mod moves;
mod node;
mod partition;
mod replicas;
mod security;
mod slow_link;
mod tls;
mod watch;
mod watch_relay;
