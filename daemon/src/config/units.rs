//! Human-readable durations (`"10s"`, `"7d"`) and sizes (`"1MiB"`) for the config file.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// A duration written as `"250ms"`, `"10s"`, `"5m"`, `"7d"` (parsed by the `humantime` crate).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl fmt::Debug for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        humantime::parse_duration(s)
            .map(HumanDuration)
            .map_err(|e| format!("invalid duration {s:?} ({e}); write e.g. \"500ms\", \"10s\", \"5m\", \"7d\""))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A size in bytes written as `"64KiB"`, `"1MiB"`, `"2GB"` or a plain number of bytes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanSize(pub u64);

impl fmt::Debug for HumanSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", bytesize::ByteSize(self.0).display().iec())
    }
}

impl FromStr for HumanSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse::<bytesize::ByteSize>()
            .map(|b| HumanSize(b.0))
            .map_err(|e| format!("invalid size {s:?} ({e}); write e.g. \"64KiB\", \"1MiB\", \"1GiB\""))
    }
}

impl<'de> Deserialize<'de> for HumanSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged, expecting = "a size such as \"1MiB\" or a number of bytes")]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(n) => Ok(HumanSize(n)),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations_and_sizes() {
        assert_eq!("10s".parse::<HumanDuration>().map(|d| d.0), Ok(Duration::from_secs(10)));
        assert_eq!("7d".parse::<HumanDuration>().map(|d| d.0), Ok(Duration::from_secs(7 * 86_400)));
        assert!("ten".parse::<HumanDuration>().is_err());
        assert_eq!("1MiB".parse::<HumanSize>().map(|s| s.0), Ok(1 << 20));
        assert_eq!("64 KiB".parse::<HumanSize>().map(|s| s.0), Ok(64 << 10));
        assert!("lots".parse::<HumanSize>().is_err());
    }
}
