#![cfg(feature = "pool")]
