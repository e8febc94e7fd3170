// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

/// @title ReentrantReceiver: a malicious payee, for tests only (never deployed for real)
/// @notice Acts as a committee member / peer. When it receives ether it calls back
/// into the target (escrow `withdraw()`, or registry `withdrawStake()`) with
/// `reentryData`. In `bubble` mode it lets a failed re-entry fail the whole
/// payment; otherwise it swallows the failure and records it.
contract ReentrantReceiver {
    address public immutable target;
    bytes public reentryData;
    bool public bubble;
    uint256 public attempts;
    bytes public lastError;

    constructor(address target_) {
        target = target_;
    }

    function configure(bytes calldata reentryData_, bool bubble_) external {
        reentryData = reentryData_;
        bubble = bubble_;
    }

    /// @notice Call the target with arbitrary data (withdraw, register, ...).
    function call(bytes calldata data) external payable returns (bytes memory) {
        (bool ok, bytes memory out) = target.call{value: msg.value}(data);
        if (!ok) {
            assembly {
                revert(add(out, 32), mload(out))
            }
        }
        return out;
    }

    receive() external payable {
        if (reentryData.length == 0) return;
        ++attempts;
        (bool ok, bytes memory out) = target.call(reentryData);
        if (!ok) {
            lastError = out;
            if (bubble) {
                assembly {
                    revert(add(out, 32), mload(out))
                }
            }
        }
    }
}
