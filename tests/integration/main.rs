//! hookbridge's integration tests: one binary, one module per capability. Every test runs the real daemon
//! (in-process through the library, or as a child process) against real HTTP peers on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout, clippy::print_stderr)]

mod common;

mod addon;
mod autotag;
mod brokers;
mod cluster;

mod config_check;
mod crash;
mod dashboard;
mod dedup;
mod delivery;
mod disk;
mod edge;
mod limits;
mod plugins;
mod quickstart;
mod reliability;
mod routing;
mod schemes;
mod systemd;
