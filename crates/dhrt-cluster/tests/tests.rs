//! Tests of dhrt-cluster, one binary.

mod binary;
mod membership;
mod node;
mod placement;
mod sim;
mod sim_leave;
