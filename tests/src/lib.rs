//! Shared harness for the root-only end-to-end tests: namespaces, links, processes.

pub mod netns;
