//! End-to-end tests of real `dhrtd` processes, one binary.

mod crash;
mod dhrtd;
mod hostile;
mod node;
