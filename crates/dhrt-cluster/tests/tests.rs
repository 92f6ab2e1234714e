//! Tests of dhrt-cluster, one binary.

mod binary;
mod digest_pages;
mod membership;
mod node;
mod placement;
mod sim;
mod sim_leave;
