// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

/// @title Signatures: the signer of a 65-byte secp256k1 signature (r | s | v)
/// @notice Shared by QueryEscrow (payment receipts) and PeerRegistry (share
/// commitments). A malleable signature (s in the upper half of the curve order),
/// a v other than 27 or 28, or a length other than 65 recovers address(0), which
/// no caller accepts as a signer.
library Signatures {
    /// secp256k1 order / 2: signatures with a larger s are malleable copies.
    uint256 private constant HALF_ORDER =
        0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0;

    function recover(bytes32 digest, bytes calldata signature) internal pure returns (address) {
        if (signature.length != 65) return address(0);
        bytes32 r;
        bytes32 s;
        uint8 v;
        assembly {
            r := calldataload(signature.offset)
            s := calldataload(add(signature.offset, 32))
            v := byte(0, calldataload(add(signature.offset, 64)))
        }
        if (uint256(s) > HALF_ORDER || (v != 27 && v != 28)) return address(0);
        return ecrecover(digest, v, r, s);
    }
}
