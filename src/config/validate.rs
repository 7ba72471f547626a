//! What the sections' `validate` functions share: [`Problems`], which records
//! each problem under its key path, and the checks more than one section
//! makes (a clock that runs, a value within a bound, a unique name). A bound
//! is printed as an operator writes it (`1s`, `8KiB`, `1h`), from the same
//! constant the check uses, so a message cannot drift from its rule.

use std::collections::HashSet;
use std::time::Duration;

use super::{Problem, Size};

/// The problems of one part of the configuration: each is recorded under the
/// part's key path (`upstream[0].pool`) followed by the field's name.
pub(super) struct Problems<'a> {
    path: String,
    found: &'a mut Vec<Problem>,
}

impl<'a> Problems<'a> {
    /// Records problems under `path` into `found`.
    pub(super) fn new(path: impl Into<String>, found: &'a mut Vec<Problem>) -> Self {
        Self {
            path: path.into(),
            found,
        }
    }

    /// The problems of a part nested in this one: `pool` of `upstream[0]`.
    pub(super) fn within(&mut self, part: &str) -> Problems<'_> {
        Problems::new(format!("{}.{part}", self.path), self.found)
    }

    /// Records that `field` of this part is wrong.
    pub(super) fn add(&mut self, field: &str, message: impl Into<String>) {
        let key = format!("{}.{field}", self.path);
        self.found.push(Problem::new(key, message));
    }

    /// `field` is a clock, and a clock of zero never runs.
    pub(super) fn positive(&mut self, field: &str, value: Duration) {
        if value.is_zero() {
            self.add(field, "must be greater than 0");
        }
    }

    /// `field` must be at least `min`.
    pub(super) fn at_least<T: Bound>(&mut self, field: &str, value: T, min: T) {
        if value < min {
            self.add(field, format!("must be at least {}", min.written()));
        }
    }

    /// `field` must be at most `max`.
    pub(super) fn at_most<T: Bound>(&mut self, field: &str, value: T, max: T) {
        if value > max {
            self.add(field, format!("must be at most {}", max.written()));
        }
    }

    /// The `name` of an entry of `kind` (`listener`, `upstream`) must be set,
    /// and not be the name of an entry already in `seen`; it is added there.
    pub(super) fn unique_name<'n>(
        &mut self,
        name: &'n str,
        kind: &str,
        seen: &mut HashSet<&'n str>,
    ) {
        if name.is_empty() {
            self.add("name", "must not be empty");
        } else if !seen.insert(name) {
            self.add("name", format!("duplicate {kind} name {name:?}"));
        }
    }
}

/// A value a check compares with a bound, and how the bound is written in
/// the message.
pub(super) trait Bound: PartialOrd + Copy {
    /// The value as an operator writes it in the file.
    fn written(self) -> String;
}

impl Bound for Duration {
    fn written(self) -> String {
        humantime::format_duration(self).to_string()
    }
}

/// Counts and sizes are written as they print.
macro_rules! bound_written_as_displayed {
    ($($type:ty),*) => {$(
        impl Bound for $type {
            fn written(self) -> String {
                self.to_string()
            }
        }
    )*};
}

bound_written_as_displayed!(usize, u32, Size);
