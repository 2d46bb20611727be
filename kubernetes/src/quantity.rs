//! Kubernetes resource quantities (`500m`, `1.5`, `640Mi`, `1e3`, `2Gi`) parsed into exact
//! numbers, so the injector can refuse a bad annotation and the resource report can add requests
//! up. `k8s-openapi`'s `Quantity` is only a string; this is the arithmetic it leaves out.
//!
//! A [`Quantity`] counts nano-units in an `i128`: exact for every suffix Kubernetes accepts
//! (`n` to `E`, `Ki` to `Ei`), far from overflow for any real request. Parsing fails with a
//! message that names the accepted forms; it never panics.

use std::fmt;
use std::ops::Add;
use std::str::FromStr;

const NANO: i128 = 1_000_000_000;

/// The binary suffixes, largest first, with their power of two.
const BINARY_UNITS: [(&str, u32); 6] = [
    ("Ei", 60),
    ("Pi", 50),
    ("Ti", 40),
    ("Gi", 30),
    ("Mi", 20),
    ("Ki", 10),
];

/// A non-negative resource quantity, in nano-units (nano-cores for CPU, nano-bytes for memory).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Quantity {
    nanos: i128,
}

impl Quantity {
    /// Zero.
    pub const ZERO: Quantity = Quantity { nanos: 0 };

    /// From whole millicores (or milli-units of anything).
    pub fn from_milli(milli: i128) -> Quantity {
        Quantity {
            nanos: milli * 1_000_000,
        }
    }

    /// From whole units (cores, bytes).
    pub fn from_units(units: i128) -> Quantity {
        Quantity {
            nanos: units * NANO,
        }
    }

    /// Whether this is zero.
    pub fn is_zero(self) -> bool {
        self.nanos == 0
    }

    /// CPU form: millicores (`600m`), or whole cores when exact (`2`).
    pub fn cpu(self) -> String {
        let milli = (self.nanos + 999_999) / 1_000_000; // Kubernetes rounds CPU up to 1m
        if milli % 1000 == 0 {
            format!("{}", milli / 1000)
        } else {
            format!("{milli}m")
        }
    }

    /// Memory as a person reads it: the largest binary unit that divides it exactly (`640Mi`),
    /// else the largest one it reaches, to one decimal (`2.2Gi` for 2331717672 bytes); bytes
    /// below 1Ki.
    pub fn memory(self) -> String {
        let bytes = self.bytes();
        if let Some(exact) = Self::exact_unit(bytes) {
            return exact;
        }
        for (suffix, shift) in BINARY_UNITS {
            let unit = 1i128 << shift;
            if bytes >= unit {
                let tenths = (bytes * 10 + unit / 2) / unit;
                return format!("{}.{}{suffix}", tenths / 10, tenths % 10);
            }
        }
        format!("{bytes}")
    }

    /// Memory written exactly, for a manifest: the largest binary unit that divides it
    /// (`640Mi`), else bytes.
    pub fn memory_exact(self) -> String {
        let bytes = self.bytes();
        Self::exact_unit(bytes).unwrap_or_else(|| format!("{bytes}"))
    }

    fn bytes(self) -> i128 {
        (self.nanos + NANO - 1) / NANO
    }

    fn exact_unit(bytes: i128) -> Option<String> {
        for (suffix, shift) in BINARY_UNITS {
            let unit = 1i128 << shift;
            if bytes != 0 && bytes % unit == 0 {
                return Some(format!("{}{suffix}", bytes / unit));
            }
        }
        None
    }
}

impl Add for Quantity {
    type Output = Quantity;

    fn add(self, other: Quantity) -> Quantity {
        Quantity {
            nanos: self.nanos.saturating_add(other.nanos),
        }
    }
}

impl std::iter::Sum for Quantity {
    fn sum<I: Iterator<Item = Quantity>>(iter: I) -> Quantity {
        iter.fold(Quantity::ZERO, Add::add)
    }
}

/// A quantity that does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantityError(String);

impl fmt::Display for QuantityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` is not a quantity (expected e.g. 100m, 0.5, 128Mi, 1Gi, 1e3)",
            self.0
        )
    }
}

impl std::error::Error for QuantityError {}

impl FromStr for Quantity {
    type Err = QuantityError;

    fn from_str(s: &str) -> Result<Quantity, QuantityError> {
        let bad = || QuantityError(s.to_owned());
        let t = s.strip_prefix('+').unwrap_or(s);
        let end = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (number, suffix) = t.split_at(end);
        let (int, frac) = number.split_once('.').unwrap_or((number, ""));
        if (int.is_empty() && frac.is_empty()) || frac.contains('.') || int.len() + frac.len() > 30
        {
            return Err(bad());
        }
        // The number as mantissa / 10^scale, then times the suffix's factor in nano-units.
        let digits = format!("{int}{frac}");
        let mantissa: i128 = digits.parse().map_err(|_| bad())?;
        let scale = u32::try_from(frac.len()).map_err(|_| bad())?;
        let (mul, div_exp): (i128, i32) = match suffix {
            "n" => (1, 0),
            "u" => (1_000, 0),
            "m" => (1_000_000, 0),
            "" => (NANO, 0),
            "k" => (NANO * 1_000, 0),
            "M" => (NANO * 1_000_000, 0),
            "G" => (NANO * 1_000_000_000, 0),
            "T" => (NANO * 1_000_000_000_000, 0),
            "P" => (NANO * 1_000_000_000_000_000, 0),
            "E" => (NANO * 1_000_000_000_000_000_000, 0),
            "Ki" => (NANO << 10, 0),
            "Mi" => (NANO << 20, 0),
            "Gi" => (NANO << 30, 0),
            "Ti" => (NANO << 40, 0),
            "Pi" => (NANO << 50, 0),
            "Ei" => (NANO << 60, 0),
            exp if exp.starts_with(['e', 'E']) => {
                let e: i32 = exp[1..].parse().map_err(|_| bad())?;
                if !(-9..=18).contains(&e) {
                    return Err(bad());
                }
                (NANO, e)
            }
            _ => return Err(bad()),
        };
        let mut nanos = mantissa.checked_mul(mul).ok_or_else(bad)?;
        let mut exp = div_exp - i32::try_from(scale).map_err(|_| bad())?;
        while exp > 0 {
            nanos = nanos.checked_mul(10).ok_or_else(bad)?;
            exp -= 1;
        }
        while exp < 0 {
            // Below a nano-unit: round up, as Kubernetes does.
            nanos = (nanos + 9) / 10;
            exp += 1;
        }
        Ok(Quantity { nanos })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn q(s: &str) -> Quantity {
        s.parse().unwrap()
    }

    #[test]
    fn parses_every_suffix_form() {
        assert_eq!(q("500m"), Quantity::from_milli(500));
        assert_eq!(q("0.5"), Quantity::from_milli(500));
        assert_eq!(q("1"), Quantity::from_units(1));
        assert_eq!(q("64Mi"), Quantity::from_units(64 << 20));
        assert_eq!(q("1.5Gi"), Quantity::from_units(3 << 29));
        assert_eq!(q("1k"), Quantity::from_units(1000));
        assert_eq!(q("1e3"), Quantity::from_units(1000));
        assert_eq!(q("+2"), Quantity::from_units(2));
        assert_eq!(q("250000u"), Quantity::from_milli(250));
    }

    #[test]
    fn refuses_garbage() {
        for bad in [
            "", "m", "1.2.3", "-1", "1x", "1 Mi", "Mi", "1e99", "one", ".",
        ] {
            assert!(bad.parse::<Quantity>().is_err(), "{bad:?} parsed");
        }
        let e = "12GB".parse::<Quantity>().unwrap_err().to_string();
        assert!(e.contains("`12GB` is not a quantity"), "{e}");
    }

    #[test]
    fn formats_cpu_and_memory() {
        assert_eq!((q("500m") + q("100m")).cpu(), "600m");
        assert_eq!(q("2").cpu(), "2");
        assert_eq!((q("512Mi") + q("128Mi")).memory(), "640Mi");
        assert_eq!(q("1000").memory(), "1000");
        assert_eq!(q("1Gi").memory(), "1Gi");
        assert_eq!(q("2331717672").memory(), "2.2Gi");
        assert_eq!(q("2331717672").memory_exact(), "2331717672");
        assert_eq!(q("1500").memory(), "1.5Ki");
        assert_eq!(q("228Mi").memory_exact(), "228Mi");
    }
}
