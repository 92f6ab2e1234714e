//! End-to-end tests of real `dhrtd` processes, one binary.

mod dhrtd;
mod node;
