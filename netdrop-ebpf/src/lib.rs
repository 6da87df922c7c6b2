//! Empty on purpose: the programs are the `netdrop` binary target. This lib target lets
//! `netdrop` declare a build-dependency, so cargo rebuilds it when the programs change.
#![no_std]
