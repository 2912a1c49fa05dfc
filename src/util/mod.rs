//! Small helpers shared by the middleware: a seedable random number source
//! and the accessor macro every middleware uses.

pub(crate) mod macros;
pub mod rng;
