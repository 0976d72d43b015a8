//! The glue: lease events become map entries, the host device and local pods follow.

pub mod endpoints;
pub mod peers;
