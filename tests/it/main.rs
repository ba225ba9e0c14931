//! End-to-end tests: the real `updraft` binary, the real load generator, real
//! sockets on loopback. Modules by purpose.

mod harness;

mod alloc;
mod config;
mod delivery;
mod file;
mod hostile;
mod http;
mod input;
mod layout;
mod loadgen;
mod mqtt;
mod native;
mod nats;
mod records;
mod reload;
mod runtime;
mod top;
mod wal;
